import sys

from ctxtrain.cli import main

sys.exit(main())
