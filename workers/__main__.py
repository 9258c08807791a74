"""`python -m workers ...`: the worker process entry point, spawned by waportd."""

from workers.worker import main

if __name__ == "__main__":
    main()
