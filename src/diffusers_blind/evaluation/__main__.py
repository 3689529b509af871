import sys

from .runner import main


sys.argv[0] = "python -m diffusers_blind.evaluation"  # the name --help shows
sys.exit(main())
