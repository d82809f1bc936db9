"""Built-in backend ``roofline``: block timings estimated from FLOPs and bytes, on no device at all.

Each phase is priced by ``hwopt.roofline``: the target's peak rate and
memory bandwidth (for this CPU, measured once and cached),
reached in full, or to the extent the target's calibration table shows.
Nothing is built or run, so a 70B model's whole search space takes
milliseconds.
"""

from __future__ import annotations

from hwopt.calibration import calibration_of
from hwopt.cpu_roof import roof_of
from hwopt.roofline import DATASHEET, roofline_ms, workload_terms
from hwopt.timing import Timer
from hwopt.workload import Workload


class RooflineBackend:
    name = "roofline"
    measures = False

    def available(self, target, scenario) -> tuple[bool, str]:
        if scenario.dtype not in target.dtypes:
            return False, f"{target.name} has no {scenario.dtype}; it computes in {', '.join(target.dtypes)}"
        lack = roof_of(target).lacks(scenario.dtype)
        if lack:
            return False, f"the {target.name} target gives {lack}"
        return True, ""

    def describe(self, target, scenario) -> dict:
        roof, fit = roof_of(target), calibration_of(target)
        ceilings = f"{roof.source}: {roof.rates(scenario.dtype)}"
        if fit is None:
            return {"model": f"the roofline model (each block takes the longer of its FLOPs at the peak rate and its "
                             f"bytes at the memory bandwidth) with {ceilings}"}
        return {"model": f"roofline calibrated on {fit.provenance()}: {fit.summary()}; {ceilings}"}

    def prepare(self, workload: Workload, target) -> Timer:
        """The roofline's milliseconds per phase, the same every round."""
        roof, fit = roof_of(target), calibration_of(target)
        efficiency = fit.efficiency if fit else DATASHEET
        ms = [roofline_ms(terms, roof, workload.dtype, workload.kv_dtype, efficiency)
              for terms in workload_terms(workload)]
        return lambda: ms

