"""How studies arrive: the archive's change feed (``sprim watch``) and the C-STORE listener."""
