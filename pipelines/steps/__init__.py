"""Built-in steps. Importing a module registers its steps."""

from pipelines.steps import (
    measure,  # noqa: F401
    mesh,  # noqa: F401
    projection,  # noqa: F401
    reformat,  # noqa: F401
    segment,  # noqa: F401
)
