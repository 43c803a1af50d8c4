"""``python -m mlcbuild``: the same as the ``mlcbuild`` console script."""

from mlcbuild.launcher import main

main()
