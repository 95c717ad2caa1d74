"""Built-in steps. Importing a module registers its steps."""
