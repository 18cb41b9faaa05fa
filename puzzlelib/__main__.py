"""`python -m puzzlelib ...`: the command line (run / show-config / status, see runner.py;
student, see student.py; fetch-parent, see parent/source.py)."""

import sys

from .runner import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["student"]:  # its own parser: it needs nothing of the runner's
        from .student import main as student_main

        sys.exit(student_main(sys.argv[2:]))
    if sys.argv[1:2] == ["fetch-parent"]:  # its own parser too (parent/source.py)
        from .parent.source import main as fetch_parent_main

        sys.exit(fetch_parent_main(sys.argv[2:]))
    sys.exit(main())
