//! `demo-upstream [ADDR]`: the counting demo API (default `127.0.0.1:3000`).

use std::net::SocketAddr;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into())
        .parse()
        .map_err(|e| std::io::Error::other(format!("invalid address: {e}")))?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("demo upstream listening on http://{addr}");
    idemgate_demo_upstream::Upstream::default()
        .serve(listener)
        .await;
    Ok(())
}
