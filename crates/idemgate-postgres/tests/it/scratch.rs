//! A fresh schema per test on the test server, dropped when the test ends.

use idemgate_postgres::PostgresStore;
use tokio_postgres::NoTls;

/// A schema of its own for one test; see [`Scratch::new`].
pub(crate) struct Scratch {
    url: String,
    schema: String,
}

impl Scratch {
    /// A fresh schema name on the server of `IDEMGATE_TEST_DATABASE_URL`, or `None`
    /// when the test is to be skipped (never under CI: there it fails instead).
    pub(crate) fn new(test: &str) -> Option<Self> {
        let url = idemgate_testkit::backend::database_url(test)?;
        let schema = format!("idemgate_test_{}", uuid::Uuid::new_v4().simple());
        Some(Self { url, schema })
    }

    pub(crate) fn schema(&self) -> &str {
        &self.schema
    }

    /// The server's URL, with `application_name` set to `app` so that a test can
    /// find (and terminate) the store's sessions.
    pub(crate) fn url(&self, app: &str) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}application_name={app}", self.url)
    }

    /// A store on the scratch schema whose sessions are named `app`.
    pub(crate) async fn store(&self, app: &str) -> PostgresStore {
        PostgresStore::builder()
            .with_schema(self.schema.clone())
            .connect(&self.url(app))
            .await
            .expect("the store connects")
    }

    /// A plain connection for the test's own statements.
    pub(crate) async fn admin(&self) -> tokio_postgres::Client {
        admin(&self.url).await
    }
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("the test connects");
    tokio::spawn(connection);
    client
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot block on a future: the
        // schema is dropped from a thread with a runtime of its own.
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(async {
                let client = admin(&url).await;
                client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) && !std::thread::panicking() {
            panic!("the scratch schema {} could not be dropped: {dropped:?}", self.schema);
        }
    }
}
