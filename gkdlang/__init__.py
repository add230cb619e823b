"""gkdlang: the .gkd language (grammar, parser, AST, checks, Spec). Imports no torch or deepspeed."""
