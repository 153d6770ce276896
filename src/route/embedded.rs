//! The embedded directory: routes in a table of the state database.

use sqlx::AnyPool;

use super::{DirFuture, Directory, DirectoryError, Route};

/// Routes kept in the `directory_routes` table of the state store's database.
#[derive(Clone)]
pub struct EmbeddedDirectory {
    pool: AnyPool,
}

impl EmbeddedDirectory {
    /// Uses the given (already migrated) pool.
    pub fn new(pool: AnyPool) -> Self {
        EmbeddedDirectory { pool }
    }
}

fn unavailable(e: sqlx::Error) -> DirectoryError {
    DirectoryError::Unavailable(e.to_string())
}

impl Directory for EmbeddedDirectory {
    fn route<'a>(&'a self, user: &'a str) -> DirFuture<'a, Option<Route>> {
        Box::pin(async move {
            let row: Option<(String,)> =
                sqlx::query_as("SELECT route FROM directory_routes WHERE email = $1")
                    .bind(user)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(unavailable)?;
            row.map(|(r,)| r.parse()).transpose()
        })
    }

    fn set_route<'a>(&'a self, user: &'a str, route: Route) -> DirFuture<'a, ()> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO directory_routes (email, route, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (email) DO UPDATE SET route = excluded.route, updated_at = excluded.updated_at",
            )
            .bind(user)
            .bind(route.as_str())
            .bind(crate::store::now())
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(())
        })
    }

    fn ping(&self) -> DirFuture<'_, ()> {
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }
}
