mod replication;
fn main() {}
