"""AST -> Spec: name resolution, method inlining, layer maps and shape checks, all diagnostics in one run.

A package of passes over a shared ``Lowerer`` (``context``): ``declarations``, ``stages``, ``expressions``
(the interpreter and the call dispatch), ``methods`` (inlining), ``combinators``, ``interventions``,
``transforms``, ``losses`` (terms and pairing) and ``readers`` (option values), run by ``driver``.
"""

from gkdlang.digest import STDLIB, spec_hash
from gkdlang.lower.context import MethodDef, Scope
from gkdlang.lower.declarations import MAX_LAYERS
from gkdlang.lower.driver import CheckResult, check_file, check_source
from gkdlang.lower.readers import number_value

__all__ = ["CheckResult", "MAX_LAYERS", "MethodDef", "STDLIB", "Scope", "check_file", "check_source", "number_value",
           "spec_hash"]
