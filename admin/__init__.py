"""Administration of a deployment: the ``triage`` command (:mod:`admin.cli`) and the embedded demo (:mod:`admin.demo`).

Sits above ``core``, beside the portal, the worker and the trainer; nothing imports it.
"""
