//! Workspace-level end-to-end tests live in `tests/tests/`; this library holds their shared
//! helpers as they arrive (train tiny → export → runtime classify → same answer).
