//! Shared test support: throwaway PostgreSQL clusters and helpers to reach them.

#![allow(dead_code)]

pub(crate) mod http;
pub(crate) mod process;

use cdc_sink::cluster::{Cluster, ClusterOptions};
use sqlx::PgPool;
use std::future::Future;
use std::time::{Duration, Instant};

/// A cluster with a fresh database `name` and a pool connected to it.
pub(crate) struct Db {
    pub cluster: Cluster,
    pub name: String,
    pub pool: PgPool,
}

impl Db {
    pub(crate) async fn new(name: &str) -> Db {
        Db::with_options(name, ClusterOptions::default()).await
    }

    /// Like [`Db::new`], on a cluster started with `opts`.
    pub(crate) async fn with_options(name: &str, opts: ClusterOptions) -> Db {
        let cluster = tokio::task::spawn_blocking(move || Cluster::start_with(opts))
            .await
            .expect("join")
            .expect("start postgresql cluster");
        cluster
            .psql("postgres", &format!("CREATE DATABASE \"{name}\""))
            .expect("create database");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(2))
            .connect(&cluster.url(name))
            .await
            .expect("connect");
        Db {
            cluster,
            name: name.to_string(),
            pool,
        }
    }

    pub(crate) fn url(&self) -> String {
        self.cluster.url(&self.name)
    }

    pub(crate) async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A fresh database `name` holding `public.kv (k INT8 PRIMARY KEY, v TEXT)`.
    pub(crate) async fn kv(name: &str) -> Db {
        let db = Db::new(name).await;
        db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT)")
            .await;
        db
    }

    /// The rows of `public.kv`, by key.
    pub(crate) async fn kv_rows(&self) -> Vec<(i64, Option<String>)> {
        sqlx::query_as("SELECT k, v FROM public.kv ORDER BY k")
            .fetch_all(&self.pool)
            .await
            .expect("read kv")
    }

    /// Rows of `table`, 0 when it does not exist (a staging table nothing was staged in).
    pub(crate) async fn count_if_exists(&self, table: &str) -> i64 {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&self.pool)
            .await
            .expect("to_regclass");
        if exists {
            self.count(table).await
        } else {
            0
        }
    }

    pub(crate) async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("count {table}: {e}"))
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) mod sink;
