//! The integration tests of the `cutover` binary: the real binary against real hosts (testlab:
//! network namespaces with their own sshd, nginx and, for container apps, dockerd and a
//! registry), real git repositories and real load. One test binary; every module builds its
//! world with the one builder in `world.rs` and meets `cutover serve` through `serve.rs`.
//! Needs root.

mod containers;
mod crash;
mod events;
mod files;
mod git;
mod git_containers;
mod git_https;
mod ha;
mod hostile_input;
mod hosts;
mod https;
mod panel;
mod previews;
mod serve;
mod server;
mod streaming;
mod webhooks;
mod world;
