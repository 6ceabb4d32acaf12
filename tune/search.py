"""python tune/search.py --task T: search the Eq. (9) weights of a task with Ray Tune (see ractd_ray.search)."""

import sys

from ractd_ray.search import main

if __name__ == "__main__":
    sys.exit(main())
