use crate::support::Db;

#[tokio::test]
async fn a_throwaway_cluster_starts_and_answers_queries() {
    let db = Db::new("harness").await;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(level, "logical");
}

#[tokio::test]
async fn a_stopped_cluster_restarts_on_the_same_port() {
    let db = Db::new("restart").await;
    let port = db.cluster.port();
    db.cluster.stop().unwrap();
    assert!(sqlx::query("SELECT 1").execute(&db.pool).await.is_err());
    db.cluster.restart().unwrap();
    assert_eq!(db.cluster.port(), port);
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
}
