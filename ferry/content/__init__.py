"""Content security (issue 4): shared vocabulary of the outside pipeline and the inside re-check.

* :mod:`ferry.content.base` -- reason codes, verdicts, actions, policy, the sanitizer contract.
"""
