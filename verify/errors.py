"""Errors raised by verify/, one tree:

    VerifyError
    ├── IdentityError     a key file, public key or peer id that is not what it claims
    ├── GrammarError      a grammar or schema the grammar engine cannot compile (verify.grammar)
    └── WrongModelError   an answer of another model than the verifier runs (verify.verifier)

A bad signature is a result (``verify_receipt`` returns False), not an error.
"""


class VerifyError(Exception):
    """Base of every error verify/ raises on purpose."""


class IdentityError(VerifyError, ValueError):
    pass
