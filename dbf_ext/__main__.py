import sys

from dbf_ext.cli import main

sys.exit(main())
