"""The shipped targets, registered like any plugin's."""

from hwopt.hookspecs import hookimpl
from hwopt.targets import shipped_targets


@hookimpl
def hwopt_register_targets(register):
    for target in shipped_targets():
        register(target)
