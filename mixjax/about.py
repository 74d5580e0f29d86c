"""Where mixjax lives: the one place that names the repository's address.

setup.cfg (`url`, `project_urls`), the README's Colab badges and the notebooks' badges and install
cells spell the address out (they cannot import it); `tests/test_package.py` checks that every
occurrence equals `REPOSITORY`.
"""

REPOSITORY = "https://github.com/mixjax/mixjax"
BRANCH = "main"


def colab_url(notebook: str) -> str:
  """The Colab address that opens `notebook` (a path in the repository, e.g. 'colabs/amp.ipynb').

  Args:
    notebook: the notebook's path relative to the repository root, with '/' separators.

  Returns:
    'https://colab.research.google.com/github/OWNER/NAME/blob/BRANCH/' + notebook.

  Raises:
    ValueError: if `notebook` is absolute or does not end in '.ipynb'.
  """
  if notebook.startswith("/") or not notebook.endswith(".ipynb"):
    raise ValueError(f"notebook must be a relative path to an .ipynb file, got {notebook!r}")
  owner_name = REPOSITORY.removeprefix("https://github.com/")
  return f"https://colab.research.google.com/github/{owner_name}/blob/{BRANCH}/{notebook}"
