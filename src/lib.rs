//! Bartleby: a backup MX mail relay for a 486 with 16 MB of RAM.
//!
//! Data flows one way: socket → [`session`] → [`spool`] → [`scheduler`] →
//! [`delivery`] → the primary. [`bounces`] turns failures into RFC 3464
//! reports, [`status`] shows the queue on the LAN, [`init`] and [`netcfg`]
//! do the appliance's PID 1 duties.

pub mod bounces;
pub mod clients;
pub mod config;
pub mod control;
pub mod courier;
pub mod data;
pub mod delivery;
pub mod dns;
pub mod dsn;
pub mod init;
pub mod logging;
pub mod mailq;
pub mod netcfg;
pub mod policy;
pub mod punycode;
pub mod reply;
pub mod route;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod spool;
pub mod stats;
pub mod status;
pub mod sys;
pub mod tls;
#[cfg(feature = "tls")]
pub mod tls_io;
pub mod util;
pub mod verify;
pub mod workers;
