"""The ablation study; the command is `egad study` (egad/study/driver.py). Kept so `python bench/study.py ...` works."""

from egad.study.driver import main

if __name__ == "__main__":
    main()
