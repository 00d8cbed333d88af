//! What both sides of a Switchboard benchmark must agree on: the result
//! schema `switchboard-load` writes and `switchboard-bench` reads, and the
//! pass rule both apply. Types only; no I/O.
