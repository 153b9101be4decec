"""The registries own their entries: what the config accepts is exactly what the registries can plan and write."""

import typing

from segpipe.config import JobSpec, MethodSpec
from segpipe.io.exports import EXPORTS
from segpipe.methods.classical import CLASSICAL
from segpipe.methods.names import CLASSICAL_NAMES, FAMILY_OF, METHODS
from segpipe.methods.segment import FAMILIES


def _literal_names(annotation) -> set[str]:
    while typing.get_origin(annotation) is not typing.Literal:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return set(typing.get_args(annotation))


def test_every_method_name_the_config_accepts_has_a_family_that_plans_and_runs_it():
    assert _literal_names(MethodSpec.model_fields["name"].annotation) == set(METHODS) == set(FAMILY_OF)
    assert set(FAMILY_OF.values()) == set(FAMILIES)
    assert set(CLASSICAL_NAMES) == set(CLASSICAL)  # the classical methods' own registry, tied to the names


def test_the_config_offers_exactly_the_registered_exports():
    from segpipe import geometry
    from segpipe.io import exports

    assert _literal_names(JobSpec.model_fields["exports"].annotation) == set(EXPORTS)
    assert exports.KINDS == set(geometry.KINDS)
