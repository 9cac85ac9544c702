"""Build script. The compiled extensions (csrc/) are optional: a missing compiler never breaks
`pip install` or `import fused_ls`; the pure-torch backend then serves."""

from setuptools import setup

setup()
