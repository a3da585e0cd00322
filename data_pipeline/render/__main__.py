import sys

from data_pipeline.render.cli import main

sys.exit(main())
