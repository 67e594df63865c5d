"""The command-line tools, one thin module each: parse arguments, call the library, print.
`common.py` holds what they share (error handling, JSON reports, the model and backend flags)."""
