import sys

from farflung.train.entry import main

sys.exit(main())
