"""Progress bars: notebook widgets when stepping through JupyterLab, plain text under the pipeline.

papermill logs a kernel's text output to the terminal as it arrives but cannot show widgets, so the
pipeline sets ``SEMMIX_PROGRESS=text`` (and a coarser ``TQDM_MININTERVAL``) for the notebooks it runs.
"""

import os

if os.environ.get("SEMMIX_PROGRESS") == "text":
    from tqdm.std import tqdm
else:
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
