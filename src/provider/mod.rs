//! Providers: where images are built and where groups of instances run. The engine talks to them only through the
//! traits here, so the local provider and the AWS provider run the same bake, promote and deploy algorithms.

pub mod local;
