"""Processing a series: the rules file, running a rule's steps and writing their outputs, ``sprim run``."""
