"""A local web page that runs the methods on an uploaded image: ``python demo.py [--model SOURCE ...] [--out DIR]``
(same as ``grounding-demo``; needs ``pip install -e ".[demo]"``). See ``grounding.demo``."""

from grounding.demo import main

if __name__ == "__main__":
    main()
