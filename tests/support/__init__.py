"""Test support: helpers shared by the test packages (not tests themselves).

- :mod:`support.stores`: SeaweedFS / GCS emulator servers on loopback.
- :mod:`support.ray_sessions`: a local Ray reused across tests.
- :mod:`support.images`: sample photographs, encoders, edge-case images, tars.
- :mod:`support.engine`: seeded random backbones and test photos for the engine.
- :mod:`support.weights_files`: weights files in the users' formats.
- :mod:`support.audit_data`: label outputs written for audit/review/export tests.
- :mod:`support.fault_proxy`, :mod:`support.fault_table`: fault injection.
- :mod:`support.labelstudio`: a real Label Studio in its own venv.
- :mod:`support.reference_cass`: the literal reference formulation of CASS.
"""

from pathlib import Path

#: The repository root.
REPO = Path(__file__).resolve().parents[2]
