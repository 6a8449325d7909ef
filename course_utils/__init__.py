"""course_utils: the finished, fast versions of what the LLM Labs notebooks teach.

Start every notebook with ``lab = course_utils.setup()``.
"""

__version__ = "0.1.0"

from .lab import Lab, setup  # noqa: E402

__all__ = ["Lab", "setup", "__version__"]
