"""The shipped hardware profiles, registered like any plugin's."""

from hwopt.hardware import shipped_profiles
from hwopt.hookspecs import hookimpl


@hookimpl
def hwopt_register_hardware_profiles(register):
    for profile in shipped_profiles():
        register(profile)
