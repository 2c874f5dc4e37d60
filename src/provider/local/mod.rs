//! The local provider: OCI image layouts in `.kiln/oci/`, instances as detached local processes, and a reverse
//! proxy per stage on a stable loopback port.

pub mod fleet;
pub mod layer;
pub mod oci;
pub mod proxy;
