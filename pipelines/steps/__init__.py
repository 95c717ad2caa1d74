"""Built-in steps. Importing a module registers its steps."""

from pipelines.steps import reformat  # noqa: F401
from pipelines.steps import segment  # noqa: F401
from pipelines.steps import mesh  # noqa: F401
from pipelines.steps import projection  # noqa: F401
