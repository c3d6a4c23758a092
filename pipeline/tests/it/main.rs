//! pai-pipeline end to end, with stages that record what they are asked to do: the order of a night,
//! its outcomes, and a run killed at every stage taken up again where it stopped.

mod nightly;
