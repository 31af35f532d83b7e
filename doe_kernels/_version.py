"""The version of the ``doe`` distribution, which ships both ``doe_kernels`` and ``doe``.

Kept in the lower package because ``doe`` may import ``doe_kernels`` but not the reverse;
``doe.__version__`` and pyproject.toml (``[tool.setuptools.dynamic]``) read it from here.
"""

__version__ = "0.1.0"
