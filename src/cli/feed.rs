//! `cdc-sink feed`: runs the changefeed emulator until interrupted.

use crate::feed::{Feed, FeedArgs};
use tokio_util::sync::CancellationToken;

pub(crate) async fn feed(args: FeedArgs) -> anyhow::Result<()> {
    let feed = Feed::new(args)?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        crate::sink::shutdown_signal().await;
        tracing::info!("signal received; stopping the feed");
        on_signal.cancel();
    });
    feed.run(cancel).await?;
    Ok(())
}
