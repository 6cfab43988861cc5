// A PLC-side OPC UA client (node-opcua, independent of the agent's asyncua) that changes the box's recipe as a
// line's controller does at a product changeover (docs/plc.md, docs/recipes.md):
//   write RecipeSelect = TARGET -> notification RecipeActive = TARGET (subscription, no polling);
//   write RecipeSelect = BAD (no such recipe) -> refused (BadOutOfRange), RecipeActive stays, LastErrorCode 4.
//
// usage: node opcua_recipe.js ENDPOINT USER PASSWORD PKI_DIR SERVER_CERT_DER TARGET BAD
// Prints one JSON object per line: {"initial": n}, {"switch": ...}, {"refused": ...}; exit 0 on success.
"use strict";
const fs = require("fs");
const path = require("path");
const {
    OPCUAClient, MessageSecurityMode, SecurityPolicy, UserTokenType, AttributeIds, DataType,
    TimestampsToReturn, ClientMonitoredItem,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const [endpoint, userName, password, pkiDir, serverCert, target, bad] = process.argv.slice(2);
const NAMESPACE = "urn:uflow-edge:plc";

function out(obj) { process.stdout.write(JSON.stringify(obj) + "\n"); }

async function main() {
    const trusted = path.join(pkiDir, "trusted", "certs");
    fs.mkdirSync(trusted, { recursive: true });
    fs.copyFileSync(serverCert, path.join(trusted, "uflow-edge-server.der"));
    const certificateManager = new OPCUACertificateManager({
        rootFolder: pkiDir, automaticallyAcceptUnknownCertificate: false,
    });
    await certificateManager.initialize();
    const client = OPCUAClient.create({
        applicationName: "plc-test-client",
        applicationUri: "urn:plc-test-client",
        securityMode: MessageSecurityMode.SignAndEncrypt,
        securityPolicy: SecurityPolicy.Basic256Sha256,
        endpointMustExist: false,
        clientCertificateManager: certificateManager,
        connectionStrategy: { maxRetry: 2, initialDelay: 200, maxDelay: 1000 },
    });
    await client.connect(endpoint);
    const session = await client.createSession({ type: UserTokenType.UserName, userName, password });
    try {
        const namespaces = await session.readNamespaceArray();
        const ns = namespaces.indexOf(NAMESPACE);
        if (ns < 0) throw new Error(`namespace ${NAMESPACE} not found in ${namespaces}`);
        const id = (name) => `ns=${ns};s=${name}`;
        const subscription = await session.createSubscription2({
            requestedPublishingInterval: 10, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
            maxNotificationsPerPublish: 100, publishingEnabled: true, priority: 10,
        });
        const seen = [];
        let waiter = null;
        const item = ClientMonitoredItem.create(
            subscription,
            { nodeId: id("RecipeActive"), attributeId: AttributeIds.Value },
            { samplingInterval: 0, discardOldest: false, queueSize: 100 },
            TimestampsToReturn.Neither,
        );
        item.on("changed", (dataValue) => {
            seen.push(dataValue.value.value);
            if (waiter) waiter();
        });
        await new Promise((resolve) => item.once("initialized", resolve));
        async function until(value, ms) {
            const deadline = Date.now() + ms;
            while (seen[seen.length - 1] !== value) {
                const left = deadline - Date.now();
                if (left <= 0) throw new Error(`RecipeActive never became ${value} (seen ${seen})`);
                await new Promise((resolve) => { waiter = resolve; setTimeout(resolve, left); });
                waiter = null;
            }
        }
        const read = async (name) => (await session.read({ nodeId: id(name), attributeId: AttributeIds.Value })).value.value;
        const select = async (index) => (await session.write({
            nodeId: id("RecipeSelect"), attributeId: AttributeIds.Value,
            value: { value: { dataType: DataType.UInt16, value: index } },
        })).name;
        while (seen.length === 0) await new Promise((resolve) => setTimeout(resolve, 10));
        out({ initial: seen[seen.length - 1] });

        const started = process.hrtime.bigint();
        const status = await select(Number(target));
        await until(Number(target), 10000);
        out({ switch: { status, active: seen[seen.length - 1], ms: Number(process.hrtime.bigint() - started) / 1e6 } });

        const refused = await select(Number(bad));
        await new Promise((resolve) => setTimeout(resolve, 300)); // a wrong RecipeActive change would show by now
        out({ refused: {
            status: refused, active: await read("RecipeActive"), notified: seen.slice(-1)[0],
            code: await read("LastErrorCode"), lastError: await read("LastError"),
        } });
        await subscription.terminate();
    } finally {
        await session.close();
        await client.disconnect();
    }
}

main().then(() => process.exit(0), (err) => { process.stderr.write(`opcua_recipe: ${err.stack || err}\n`); process.exit(1); });
