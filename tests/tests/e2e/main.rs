//! End-to-end tests: the real Worker in wrangler dev, the real sandbox host and agent, on loopback.
//! One binary with modules, so the harness is compiled once.

mod agent;
mod bad_input;
mod children;
mod durability;
mod fanout;
mod flow;
mod lifecycle;
mod link;
mod membership;
mod multiplayer;
mod repo;
mod smoke;
