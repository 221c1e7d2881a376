"""``python -m mffzoo`` (and so ``torchrun -m mffzoo train ...``)."""

from .cli.main import main

if __name__ == "__main__":
    main()
