"""Built-in plugin: the solvers ``scip`` (the default), ``highs`` and ``greedy`` (``hwopt.builtin.mip_solvers``).

Each is registered ``Lazy``: its module (and numpy, scipy and pyscipopt
with it) is imported only when solve asks for a solver, so that
``hwopt plugins`` and ``hwopt targets`` start at once.
"""

from hwopt.hookspecs import hookimpl
from hwopt.plugins import Lazy


@hookimpl
def hwopt_register_solvers(register):
    for name, factory in (("scip", "ScipSolver"), ("highs", "HighsSolver"), ("greedy", "GreedySolver")):
        register(Lazy(name, "hwopt.builtin.mip_solvers", factory))
