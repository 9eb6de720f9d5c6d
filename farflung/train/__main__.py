import atexit
import os
import sys

from farflung.train.entry import main

code = main()
# A finished worker leaves without tearing the interpreter down, as multiprocessing's
# children do: exit handlers run and the streams are flushed, but freeing torch's
# thousands of modules and objects one by one (~1 s of CPU per worker, paid by every
# run's start and end) changes nothing a later process reads.
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
