//! The private Postgres cluster is private (issue 19, item 2): the ledger needs the password
//! generated at `initdb` (another local account without it is refused), and a cluster
//! directory Ludus did not create is never joined.

use std::os::unix::fs::PermissionsExt;

use ludus::ledger::cluster::PrivateCluster;

use super::database::{block_on, shared_cluster};

/// Connects with `url`; the error text, if refused.
fn connect(url: &str) -> Result<(), String> {
    block_on(async {
        let (client, connection) =
            tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| format!("{e:?}"))?;
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await.map(|_| ()).map_err(|e| e.to_string())
    })
}

#[test]
fn the_ledger_refuses_a_local_user_without_the_generated_password() {
    let cluster = shared_cluster();
    connect(&cluster.url("postgres")).expect("the server's own URL connects");
    let port = cluster.port;
    for (who, url) in [
        ("no password", format!("postgres://ludus@127.0.0.1:{port}/postgres")),
        ("a wrong password", format!("postgres://ludus:guess@127.0.0.1:{port}/postgres")),
        ("the postgres role", format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres")),
    ] {
        // (Without a password the client gives up when the server asks for one; under the
        // old trust authentication all three got in.)
        let refused = connect(&url).expect_err(&format!("{who} reached the ledger"));
        let asked = refused.contains("password missing") || refused.contains("password authentication failed");
        assert!(asked, "{who}: {refused}");
    }
    // The password sits in the cluster directory, readable by its owner only.
    let file = cluster.data_dir.join("ludus.password");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&cluster.data_dir).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn a_cluster_directory_ludus_did_not_create_is_never_joined() {
    let dir = tempfile::tempdir().unwrap();
    // Traversable, so that it is used where it is (as root too).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.path().join("PG_VERSION"), "15\n").unwrap();
    let e = PrivateCluster::ensure(dir.path()).expect_err("joined a cluster without its password file");
    assert!(e.to_string().contains("was not created by this version of Ludus"), "{e}");
    // Nor is anything else made in a directory that holds files.
    let other = tempfile::tempdir().unwrap();
    std::fs::set_permissions(other.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(other.path().join("notes.txt"), "mine").unwrap();
    let e = PrivateCluster::ensure(other.path()).expect_err("created a cluster over other files");
    assert!(e.to_string().contains("is not empty"), "{e}");
}
