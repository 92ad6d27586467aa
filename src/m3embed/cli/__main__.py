import sys

from m3embed.cli import main

sys.exit(main())
