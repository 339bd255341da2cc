"""Data: where samples come from (generated, ImageFolder and its index, torchvision sets, the
user's), decoding and per-sample transforms in the loader workers, samplers that keep a global
position, the loaders, and the device batch stages that run after the copy."""
