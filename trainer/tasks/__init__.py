"""Tasks: what is learnt and how it is scored (loss, target form, evaluation meter, metric names,
pictures): single-label classification, multi-label classification, or the user's own
(``task.name=my_pkg.tasks:build``; see trainer.tasks.base and trainer.tasks.registry)."""
