"""``python -m launcher``: inspect the machine, pick how to start the Worker, print the plan, run it.

Each Worker process chooses its own ``OMP_WAIT_POLICY`` from the ``LOCAL_WORLD_SIZE`` and
``OMP_NUM_THREADS`` it is started with (trainer/openmp.py); the launcher sets neither policy nor
anything the Worker would mistake for the user's choice.
"""
